// Add a card: Stripe Elements and a SetupIntent (the card goes to Stripe, never to us).
import {PortalError, saveNewCard, say, stripe, newKey} from './portal.js';

const form = document.getElementById('card-form');
const status = document.getElementById('card-status');
const button = document.getElementById('save-card');
document.getElementById('card-entry').hidden = false;

let client = null;
let card = null;
try {
  client = stripe();
  card = client.elements().create('card');
  card.mount('#card-element');
} catch (err) {
  say(status, err.message, 'error');
}

form.addEventListener('submit', async (event) => {
  event.preventDefault();
  if (card === null) return;
  button.disabled = true;
  say(status, 'Saving your card with Stripe…', null);
  try {
    const setDefault = document.getElementById('set-default').checked;
    await saveNewCard(client, card, {setDefault, key: newKey('portal-card')});  // a new SetupIntent per attempt
    say(status, 'Card saved.', 'ok');
    window.location.assign('/portal/payment-methods?notice=card_added');
  } catch (err) {
    say(status, err instanceof PortalError ? `Not saved: ${err.message}.` : `Something went wrong: ${err.message}`, 'error');
    button.disabled = false;
  }
});
